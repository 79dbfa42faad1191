"""The housekeeping worker: arq cron jobs running ``relay.housekeeping``."""
