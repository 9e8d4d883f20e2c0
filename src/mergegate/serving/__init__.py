"""Talking to and starting OpenAI-compatible model servers: one client (`client`: requests, answers within the
bounds of `bounds`, one retry rule), one launcher (`launcher`: a command's server, or an app in a thread), and one
way to wait until a server is ready (`ready`)."""
