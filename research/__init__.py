"""KOALA Edge research: experiments, candidate strategies and probes (README.md here).

Not part of the product: nothing in server_app, device_firmware_py or bench imports it, it is not
in the wheel, and CI does not run its tests (tests/research, marker `research`). It may import the
product and bench.
"""
