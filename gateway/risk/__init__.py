"""Risk monitoring and early warning: signals written with the decisions that cause them (an outbox),
rules over time windows that turn them into events, and the events' delivery (HTTP, SSE, webhooks, a
signed daily report). Never on the request path: a decision only writes its signal."""
