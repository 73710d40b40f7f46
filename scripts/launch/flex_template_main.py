"""The Flex Template's program (the Dockerfile's FLEX_TEMPLATE_PYTHON_PY_FILE).

Dataflow's template launcher runs it as `python flex_template_main.py --PARAM=VALUE ...
--runner=DataflowRunner --project=… --region=… --temp_location=… --template_location=…`
with each template parameter (metadata.json beside this file) as one flag:
`python -m layerbeam.launch` takes them. A file rather than `-m`: the launcher runs a path.

Workers run the same image, which has layerbeam and every dependency installed: nothing
is staged (`--sdk_location=container` unless the launch sets it).
"""

import sys

from layerbeam.launch import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--sdk_location") for a in argv):
        argv.append("--sdk_location=container")
    sys.exit(main(argv))
