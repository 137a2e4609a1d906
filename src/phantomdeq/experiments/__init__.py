"""Paper experiments as commands, one module each -- :mod:`.synthetic` (Fig. 1, ``phantomdeq
synthetic``), :mod:`.ablation` (Table 1 and Fig. 3, ``phantomdeq ablate``), :mod:`.cost`
(Table 2, ``phantomdeq cost``), :mod:`.demo` (``phantomdeq demo``) -- with their reports
(:mod:`.report`), the measuring tools (:mod:`.measure`) and the one command convention they
share (:mod:`.command`)."""
