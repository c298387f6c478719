"""HTTP layer: request/response schemas, thin routes, error mapping."""
