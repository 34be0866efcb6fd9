"""thinkfast's distribution layer: Ray Data, Ray Train, Ray Serve and Ray jobs around the
``thinkfast`` library, plus the ``thinkfast`` command line.

The source folder is ``pipelines/`` (as the design lays out the repository); it installs
under the import name ``thinkfast_pipelines`` so that it cannot collide with another
distribution's top-level ``pipelines`` package. Nothing is imported here: each
subcommand's module loads only when it runs.
"""
