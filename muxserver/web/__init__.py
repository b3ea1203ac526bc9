"""Static files of the web chat page, served by the WebSocket transport."""
