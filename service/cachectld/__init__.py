"""cachectld: the daemon that watches folders and hands each complete checkpoint to cachectl.

It imports the `cachectl` library; the library never imports it. The watching process
itself stays free of torch (importing it costs ~300 MB of memory and seconds): only the
worker processes load `cachectl.cache`.
"""
