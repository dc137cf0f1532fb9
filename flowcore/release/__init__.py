"""The zoo's release steps, as ``flowcore release`` commands run in a checkout: re-evaluate shipped checkpoints
(``evaluate``), regenerate the report, the README's results and the model cards (``report``), the download
manifest (``manifest``) and the bundled example images (``examples``). The top floor: it reads every other room."""
