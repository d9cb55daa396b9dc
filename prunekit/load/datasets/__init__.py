"""Small datasets shipped inside the package (see NOTICE.md for origin and licence)."""
