"""Browser tests of the web page served at /ui/ (headless Chromium driven by selenium)."""
