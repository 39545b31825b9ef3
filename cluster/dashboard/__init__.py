"""`fab dashboard`: the run's figures, live, in a browser (README.md, "Dashboard").

- ``data.py``: one JSON snapshot of the store (runs, and one run's report from
  cluster/report.py, the same figures ``fab stats`` shows, plus the series the charts draw);
- ``server.py``: a read-only, GET-only HTTP server for that snapshot and the page;
- ``static/``: the page, its script and style (hand-drawn SVG, no third-party code).
"""
