"""Local stand-ins for the providers' HTTP APIs, with fault injection."""
