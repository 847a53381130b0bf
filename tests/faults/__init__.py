"""The fault suite: each promise of docs/faults.md as a test (kill -9, disk full, tampered files, odd sources)."""
