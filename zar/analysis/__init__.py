"""What turns MLflow runs into tables, a pipeline fetch -> table -> render with no way back.

- ``fetch``: runs to rows (``RunRow``, ``BenchRun``), the settings a row's runs must share
  (``GUARDED``), and a study's or sweep's parent run, read once (``describe_parent``).
- ``stats``: mean and spread, Welch's t and CI, Holm's adjustment.
- ``grouping``: which runs share a row, its label and order, and the comparability guard.
- ``bench``: each row joined to the ``zar bench`` run that measured its settings.
- ``table``: ``build_table``, rows against their baseline, and the notes that say how to read them.
- ``render``: the table as Markdown, CSV, JSON or LaTeX.
- ``comparison``: fetch, guard and build with ``zar compare``'s options; ``zar report`` shares it.
- ``trials``: a sweep's tables (best trial per architecture, and its --seeds runs).
- ``report``: ``zar report``, the study as one HTML page or a Markdown folder.
- ``study_table``: what a study keeps in its parent run: the table, figures, metrics and page.

No re-exports here: importing the package imports none of them, so no cycle can pass through it.
"""
