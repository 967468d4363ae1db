"""Report artifacts of the evaluation: figures and tables for ``snakemake --report``.

``plots`` turns every evaluated method's ``metrics.json`` into the recall-vs-round and BRI
figures and the per-round metric tables (TSV and a small HTML table); ``ranked_lists`` draws a
few dialogues of one method round by round: the query, the question asked and its answer, and
the top-k gallery images with the target identity outlined.
"""
