"""Miniature reproductions of the seed papers' central claims, each ending in a verdict.

`moekit experiment NAME [--quick]` runs one, with seeds and confidence intervals, and writes
`results.json` (with a `verdict` field) and `report.html`. The verdict is one of "reproduced",
"not reproduced at this scale" or "inconclusive", always with the numbers it rests on.
"""
