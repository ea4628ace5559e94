"""Spell HTTP binding values the way function.json schemas expect.

azure-functions writes enum *names* into the indexed bindings ("FUNCTION", "GET"); the
Functions host reads them case-insensitively, but the SchemaStore function.json schema
that editors (and our app check) use only allows lower case. These enums stringify to the
lower-case names and pass through the decorators untouched, because only `str` values are
converted.
"""

from azure.functions.decorators.utils import StringifyEnum


class AuthLevel(StringifyEnum):
    anonymous = "anonymous"
    function = "function"
    admin = "admin"


class Method(StringifyEnum):
    get = "get"
    post = "post"
    put = "put"
    delete = "delete"
    patch = "patch"
