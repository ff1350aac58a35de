"""One router per resource; each handler parses, calls the service for the caller's tenant, serialises."""
