"""vdiff's client package: the OpenAI-compatible server in front of vdiff's Triton models.

`vdiff_client.server.build_app` is the FastAPI app; `vdiff-proxy` (`vdiff_client.cli`) runs it
against a Triton server that is already up; the `vdiff` command starts Triton and this together.
"""

__version__ = "0.1.0"
