"""`python -m minicpm_convert.families`: print the support matrix (the README's variants table)."""

from . import support_matrix

print(support_matrix(), end="")
