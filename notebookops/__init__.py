"""notebookops: run Jupyter notebooks from Azure DevOps on Azure ML (or locally) with Durable Functions.

The package is the domain: it holds no Functions-host plumbing beyond the types it must accept.
"""

__version__ = "0.1.0"
