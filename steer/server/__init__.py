"""The gRPC front end, and :class:`SteerServer`, the process that serves both front ends.

The shared core (settings, scheduler, models, artifacts, SAEs, sliders, jobs, conversion) is
:mod:`steer.service`; here only what speaks gRPC:

* ``status``     -- failures -> gRPC status codes, applied to every rpc
* ``auth``       -- bearer-token interceptor
* ``servicers``  -- one class per proto service
* ``app``        -- :class:`SteerServer`: the gRPC services, health, reflection and the HTTP API
  (:mod:`steer.http`) on one event loop
"""

from steer.server.app import SteerServer
from steer.service.settings import ServerSettings

__all__ = ["ServerSettings", "SteerServer"]
