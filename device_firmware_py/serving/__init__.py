"""On-device serving and on-device data: the agent's local endpoint for applications.

predictor.py (the served model, swapped atomically after each round), local_api.py (HTTP on a Unix
socket / loopback), client.py (DeviceClient: the Python API for applications), sample_store.py
(the bounded store of labeled samples the device trains on), spool.py (samples dropped as files),
command.py (`koala-device predict` / `koala-device feed`). Stdlib + numpy + LiteRT only.
"""
