"""The gRPC service: thin servicers over the engine.

Layout (one concern per module):

* ``settings``   -- :class:`ServerSettings`, the one typed schema of limits and flags
* ``status``     -- domain exception -> gRPC status mapping, applied to every rpc
* ``convert``    -- proto messages <-> steer domain objects (the only module that knows both)
* ``scheduler``  -- one engine loop thread per model; requests join its running batch
* ``registry``   -- loaded models by id
* ``store``      -- vector artifacts under the models root
* ``saes``       -- loaded SAEs by id, each bound to its model
* ``paths``      -- confinement of user paths to the models root
* ``auth``       -- bearer-token interceptor
* ``jobs``       -- generic job runner (progress, cancel, result) for directions and bakes
* ``servicers``  -- one class per proto service
* ``app``        -- :class:`SteerServer`: wires it all into a ``grpc.Server``
"""

from steer.server.app import SteerServer
from steer.server.settings import ServerSettings

__all__ = ["ServerSettings", "SteerServer"]
