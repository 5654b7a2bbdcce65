"""The gateway's HTTP side: the OpenAI-compatible app (`gateway.http.app.create_app`), split by job."""
