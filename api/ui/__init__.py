"""The web page (static files: index.html, *.js, *.css), served at ``/ui/`` by api/routes/ui.py."""
