"""The training floor: from a validated config to a finished, recorded run.

``build`` assembles data, model, optimizer and the step; ``engine.fit`` runs the epochs;
``checkpoint`` saves and resumes them; ``schedule``, ``health``, ``console`` and ``signals``
serve the loop. Nothing here imports the sweep runtime: a sweep worker hands a run what it
needs (device, names, parent run, callbacks, warm data) explicitly.
"""
