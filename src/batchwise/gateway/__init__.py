"""`batchwise serve`: an OpenAI-compatible gateway in front of the store and the scheduler.

Existing code keeps its SDK and changes only its base URL and key: `app.py` builds the ASGI
app (Starlette), one module per API family (`files.py`, `batches.py`, `realtime.py`),
`keys.py` makes and checks the gateway's keys, `serve.py` runs it on uvicorn with the embedded
scheduler beside it when there is no broker.
"""
