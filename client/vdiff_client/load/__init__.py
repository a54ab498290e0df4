"""Load tests for OpenAI endpoints: Locust users (`locustfile.py`) and a headless runner (`vdiff-load`).

Only `locustfile.py` imports Locust (and with it gevent's monkey-patching); it runs in a Locust
subprocess that `runner.py` starts, so the caller's process is never patched.
"""
