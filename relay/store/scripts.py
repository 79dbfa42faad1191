"""The Lua scripts of the hot path: one round trip, atomic, each.

Every key they touch shares the hash tag ``{prefix}`` (``relay.keys``), so
they stay valid on a Redis Cluster even where they build key names inside.
"""

from __future__ import annotations

# Route a consumer request: read the row, and for a live virtual row record
# the task and push it to the inbox of the replica holding the session.
# KEYS[1] llm row. ARGV: tag, taskId, consumerReplica, now, taskTtlMs,
# payload, inboxMaxlen, llmName, kind.
ROUTE = """
local row = redis.call('HMGET', KEYS[1], 'kind', 'status', 'providerSessionId', 'url', 'apiKey', 'model',
  'wakeMaxWaitSeconds')
if not row[1] then return {'unknown'} end
if row[1] == 'public' then return {'public', row[4] or '', row[5] or '', row[6] or ''} end
if row[2] == 'inactive' then return {'inactive'} end
local sid = row[3]
if ARGV[9] == 'wake' then
  if row[2] == 'active' then return {'awake'} end
elseif row[2] == 'hibernating' then
  return {'hibernating', sid, row[7] or ''}
end
local tag = ARGV[1]
local skey = tag .. ':session:' .. sid
local sess = redis.call('HMGET', skey, 'replica', 'principal')
local replica = sess[1]
if (not replica) or replica == '' or redis.call('EXISTS', tag .. ':replica:' .. replica) == 0 then
  return {'offline', sid}
end
local tkey = tag .. ':task:' .. ARGV[2]
redis.call('HSET', tkey, 'session', sid, 'principal', sess[2], 'replica', ARGV[3],
  'llm', ARGV[8], 'kind', ARGV[9], 'createdAt', ARGV[4])
redis.call('PEXPIRE', tkey, ARGV[5])
local tset = skey .. ':tasks'
redis.call('SADD', tset, ARGV[2])
redis.call('PEXPIRE', tset, ARGV[5])
if replica ~= ARGV[3] then
  redis.call('XADD', tag .. ':inbox:' .. replica, 'MAXLEN', '~', ARGV[7], '*',
    'k', 'task', 's', sid, 't', ARGV[2], 'r', ARGV[3], 'd', ARGV[6])
end
return {'ok', replica, sid, sess[2]}
"""

# A publisher posts for a task: check ownership, optionally finish the task,
# and forward the payload to the inbox of the replica where the consumer waits.
# KEYS[1] task. ARGV: tag, taskId, sessionId, principal, selfReplica,
# messageKind, payload, inboxMaxlen, final ('1' ends the task), viaInbox ('1':
# through the inbox even when the consumer waits on selfReplica, to keep order).
POST = """
local t = redis.call('HMGET', KEYS[1], 'session', 'principal', 'replica')
if not t[1] then return {'unknown'} end
if t[1] ~= ARGV[3] or t[2] ~= ARGV[4] then return {'forbidden'} end
if ARGV[9] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[1] .. ':session:' .. t[1] .. ':tasks', ARGV[2])
end
if t[3] ~= ARGV[5] or ARGV[10] == '1' then
  redis.call('XADD', ARGV[1] .. ':inbox:' .. t[3], 'MAXLEN', '~', ARGV[8], '*',
    'k', ARGV[6], 't', ARGV[2], 'd', ARGV[7])
end
return {'ok', t[3]}
"""

# The consumer is gone (disconnect, timeout): forget the task and tell the
# replica that holds the session now, so the publisher aborts it.
# KEYS[1] task. ARGV: tag, taskId, selfReplica, inboxMaxlen.
CANCEL = """
local sid = redis.call('HGET', KEYS[1], 'session')
if not sid then return {'none'} end
redis.call('DEL', KEYS[1])
local skey = ARGV[1] .. ':session:' .. sid
redis.call('SREM', skey .. ':tasks', ARGV[2])
local replica = redis.call('HGET', skey, 'replica')
if (not replica) or replica == '' then return {'none'} end
if replica == ARGV[3] then return {'local', sid} end
redis.call('XADD', ARGV[1] .. ':inbox:' .. replica, 'MAXLEN', '~', ARGV[4], '*',
  'k', 'cancel', 's', sid, 't', ARGV[2])
return {'remote', sid}
"""
