"""Research kit for the hashguard workbooks.

One launcher (``launcher.Lab``), one client (``client.SidecarClient``), one counters reader
(``counters.Counters``), one loop over resumable cells with one result row (``cells``), ART
estimators over the sidecar (``estimators``), query routers (``routing``), and the
experiments (``tables``, ``adaptive``, ``sidechannel``, ``benign``, ``timing``) with the
report (``report``). Notebooks in ``workbooks/`` are the source; they call these.
"""
