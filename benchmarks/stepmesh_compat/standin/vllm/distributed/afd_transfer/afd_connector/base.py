class AFDConnectorBase:
    """The connector interface of vLLM's AFD branch (its methods are the subclass's)."""
