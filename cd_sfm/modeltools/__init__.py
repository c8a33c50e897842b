"""Model tooling, apart from inference (:mod:`cd_sfm.models`): import and parity of the official frozen graphs
(``frozen.py``), download and import into the cache (``manage.py``), the int8 quantiser (``quantize.py``) and the
``cd-sfm models`` commands (``cli.py``). Arrows point one way: tooling uses ``cd_sfm.models``, never the reverse.
"""
