"""What the tests share besides fixtures: paths and commands (``paths``), pipeline inputs built on the built-in
sample (``pipeline_inputs``), the teacher tests' project (``teacher_project``), small stand-in models and stores.

Test files import from here (``from tests.helpers.paths import REPO``), never from each other or from
``conftest.py``, which holds only fixtures and hooks (tests/test_layout.py checks it).
"""
