"""`vdiff serve`: run vdiff's Triton model repository on a tritonserver, one command."""
