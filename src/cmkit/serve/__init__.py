"""`cmkit serve`: a local web page and HTTP API (FastAPI + uvicorn; ``pip install 'cmkit[serve]'``)."""
