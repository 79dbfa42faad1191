"""The publisher agent: runs next to a model server and publishes it on a relay.

Public API: :class:`Agent` (run in-process), :func:`load_config` /
:class:`PublisherConfig` (configuration) and ``relay.publisher.cli.main``
(the ``relay publish`` command).
"""

from .agent import Agent
from .config import ConfigError, ProviderConfig, PublisherConfig, load_config

__all__ = ["Agent", "ConfigError", "ProviderConfig", "PublisherConfig", "load_config"]
