"""Local stand-ins for services that cannot run on a test machine (GCE has no emulator)."""
