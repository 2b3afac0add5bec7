"""The service core both front ends share (gRPC in :mod:`steer.server`, HTTP in
:mod:`steer.http`); nothing here imports grpc.

One concern per module:

* ``settings``   -- :class:`ServerSettings`, the one typed schema of limits and flags
* ``core``       -- :class:`ServiceCore`: models, artifacts, SAEs, sliders, jobs; request -> stream
* ``convert``    -- proto messages <-> steer domain objects, one module per service
* ``sliders``    -- named sliders: the operator's TOML catalogue
* ``scheduler``  -- one engine loop thread per model; requests join its running batch
* ``registry``   -- loaded models by id
* ``store``      -- vector artifacts under the models root
* ``saes``       -- loaded SAEs by id, each bound to its model
* ``paths``      -- confinement of user paths to the models root
* ``jobs``       -- generic job runner (progress, cancel, result) for directions and bakes
* ``failures``   -- an exception -> (status name, message, field), for every front end
* ``auth``       -- the bearer-token check
"""
