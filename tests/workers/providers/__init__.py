"""Provider adapters through their official SDKs against the local emulators."""
