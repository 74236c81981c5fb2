"""The engine as a service: a process that keeps the models loaded and runs the jobs of its
clients, locally for 3D Slicer or on a GPU server for many users.

- :mod:`.protocol`: the routes, the request and response shapes, the shared constants and
  the NRRD bytes codec (standard library and numpy only: both sides use it).
- :mod:`.server`: the FastAPI app (``swinunetr-segment serve``, run by uvicorn);
  :mod:`.jobs`: the queue per device, the workers, the loaded models (:mod:`.job`: one
  job); :mod:`.auth`: the bearer tokens, compared in constant time; :mod:`.pacs`: DICOMweb
  jobs (a series the server fetches from a PACS its operator configured, and stores to).
- :mod:`.client`: the client, importable in 3D Slicer's own Python (standard library,
  requests, numpy: no torch, MONAI or fastapi); it talks to a server URL with a token;
  :mod:`.local`: the local engine process it starts, reuses and restarts
  (:class:`~.local.LocalEngine`, also importable from :mod:`.client`).
- :mod:`.remote`: the command line's ``--server``: a segmenter whose work the service does.

Nothing is imported here, so that ``import SwinUNETRSegmentLib.service.client`` costs only
what the client needs.
"""

__all__ = ["auth", "client", "job", "jobs", "local", "pacs", "protocol", "remote", "server"]
