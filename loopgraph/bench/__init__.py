"""``loopgraph bench``: denoising throughput of one loop, every method run side by side on identical inputs.

The modules, each importing only those listed above it:

    methods     the methods compared (eager, compile_denoiser, compile_loop, ...) and how each runs the loop
    loop        a run's options (``BenchConfig``) and the loop each method gets a fresh copy of: a zoo preset, a
                diffusers loop, or the user's ``--loop MODULE:FUNCTION`` (``user_loop``)
    measure     what is measured of each method and how: timed calls, Python calls, peak memory, the floor
    report      the rows of ``bench.json``, the table and findings the CLI prints, the files written
    cold_start  ``--cold-start``: each method's first result in fresh processes (it runs itself as the child)
    run         a run from start to end: ``run_bench`` (what ``loopgraph bench`` calls) and ``run_loop`` (from
                Python)

Nothing is imported here: a name has one import path, its module's.
"""
