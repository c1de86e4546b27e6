"""The console's routes, one module per page group; each module's `router` is mounted under /ui."""
