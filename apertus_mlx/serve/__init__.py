"""The bridge for apps: an OpenAI-compatible local HTTP server and JSON-RPC over stdio, on one `Engine`.

`python -m apertus_mlx.serve` starts either (see `__main__.py`). Both faces parse requests with
`requests.py`, lease chats from one `SessionPool`, and turn engine events into OpenAI's shapes with
`responses.py`; neither calls MLX.
"""
