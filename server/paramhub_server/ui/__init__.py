"""`paramhub ui`: a web inspector of a paramhub server's live models.

It is one more client of the server, through the SDK only (paramhub.connect and the Client's
public methods), with its own token that never reaches the browser:

    views.py   DescribeModel / Probe / GetTensor answers -> plain dicts the pages draw
    feeds.py   one SDK watch per model, fanned out to every open page (Server-Sent Events);
               one Probe per watched tensor per change, coalesced
    app.py     the Starlette app: pages, JSON, the event streams, the guarded edits
    serve.py   uvicorn on a socket bound before it starts (the address is printed first)
"""

from paramhub_server.ui.app import build_app
from paramhub_server.ui.serve import UIServer, detect_role

__all__ = ["build_app", "UIServer", "detect_role"]
