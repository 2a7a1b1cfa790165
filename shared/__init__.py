"""presence-bridge core library.

Everything here runs without the Azure Functions runtime: nothing in this package imports
``azure.functions``. The adapters in ``functions/`` turn triggers into calls to this package.
"""
