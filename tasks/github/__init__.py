"""GitHub side effects under the fence: client, rendering, publisher, and a stand-in server."""
