"""One module per endpoint family; each route is parse → call → render."""
