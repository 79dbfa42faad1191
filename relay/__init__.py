"""Relay: publish self-hosted LLMs and reach them by name through one OpenAI endpoint."""
