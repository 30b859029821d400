"""Local model backend: a loopback HTTP server (``refound serve``) and its stdlib-only client.

The client and the protocol import only the standard library (the QGIS plugin uses them without
torch); the server imports the model stack lazily."""
