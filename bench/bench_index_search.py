"""First-stage search at 100,000 vectors: our exact inner product vs FAISS (issue 17: an ANN library only if it
installs from the registry and beats exact search at this size).

The vectors stand in for a dual encoder's image embeddings: unit vectors drawn around `--clusters` random centres
(real embeddings cluster; uniform random vectors would be the hardest case for every ANN method). Queries are
fresh draws from the same mixture, not in the index. Per method: build seconds, ms per query one at a time (Serve's
pattern: one text query per request) and per query in one batch of all queries (the evaluate job's pattern), and
recall@k against the exact top k (`--k`: 10 by default; Serve's first stage asks for its `candidates`, 100-200).

The product's two methods (index/search.py, Serve's `retriever.search`): exact (`ExactSearch`: torch inner product
+ `top_k`) and ivf (`IvfSearch`: FAISS IVF-Flat, lists 4·√n, at several probes, build time including the k-means).
Beside them, FAISS methods the product does not offer: IndexFlatIP (exact, its own BLAS) and HNSW (M 32) at several
efSearch; every FAISS method gets torch's thread count. faiss-cpu comes with the `ann` and `test` extras; without it
only exact search is measured. After every single search the bench times a fixed torch matrix product, against the
same product run alone: Serve re-ranks right after the search, and a library whose thread pool keeps spinning after
a search takes cores from that re-rank (index/store.py's inner_products docstring: numpy's OpenBLAS did).

    .venv/bin/python bench/bench_index_search.py [--vectors 100000] [--dims 64 256] [--queries 200] [--k 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from common import git_commit, print_table, write_results

from mengzi_ray.index.card import SearchSection
from mengzi_ray.index.search import ExactSearch, build_search

SCRIPT = "bench_index_search"
EXACT = "exact (index.search.ExactSearch)"

Search = Callable[[np.ndarray, int], np.ndarray]  # (Q, dim) queries, k -> (Q, k) indices, best first


def clustered_unit_vectors(rng: np.random.Generator, count: int, centres: np.ndarray, spread: float) -> np.ndarray:
    """`count` unit vectors, each a random centre plus Gaussian noise of std `spread` per dimension."""
    picks = rng.integers(0, len(centres), size=count)
    x = centres[picks] + rng.normal(scale=spread, size=(count, centres.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(vectors: np.ndarray) -> Search:
    index = ExactSearch(vectors)
    return lambda queries, k: index.search(queries, k)[0]


def faiss_methods(vectors: np.ndarray) -> dict[str, tuple[float, Search]]:
    """name -> (build seconds, search) for the product's IVF search and FAISS's other indexes; {} without faiss."""
    try:
        import faiss
    except ImportError:
        return {}
    faiss.omp_set_num_threads(torch.get_num_threads())
    dim = vectors.shape[1]
    out: dict[str, tuple[float, Search]] = {}

    def searcher(index, configure: Callable[[], None] = lambda: None) -> Search:
        """index.search's top-k indices, after `configure` sets the index's search parameter."""
        def search(queries: np.ndarray, k: int) -> np.ndarray:
            configure()
            return index.search(np.ascontiguousarray(queries), k)[1]
        return search

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    out["FAISS IndexFlatIP (exact)"] = (time.perf_counter() - start, searcher(flat))

    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(vectors)
    built = time.perf_counter() - start
    for ef in (32, 64, 128, 256):
        out[f"FAISS HNSW M32 efSearch {ef}"] = (built, searcher(hnsw, lambda ef=ef: setattr(hnsw.hnsw, "efSearch", ef)))

    for probes in (8, 32, 128):
        start = time.perf_counter()
        ivf = build_search(vectors, SearchSection(method="ivf", probes=probes))
        built = time.perf_counter() - start
        out[f"ivf (index.search.IvfSearch, {ivf.lists} lists) probes {probes}"] = (
            built, lambda queries, k, ivf=ivf: ivf.search(queries, k)[0])
    return out


def rerank_stand_in() -> Callable[[], float]:
    """A fixed torch workload of about the cross-encoder re-rank's kind (a matrix product on torch's OpenMP team);
    returns a function that runs it once and gives its milliseconds."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)

    def run() -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        return (time.perf_counter() - start) * 1000

    return run


def measure(search: Search, queries: np.ndarray, truth: np.ndarray, rerank: Callable[[], float]) -> dict[str, float]:
    """ms per query one at a time and in one batch, mean recall@k against `truth` (Q, k), and the ms of the torch
    workload run right after each single search (a thread pool that spins after the search slows it: Serve re-ranks
    the shortlist with the cross-encoder right after the search)."""
    k = truth.shape[1]
    search(queries[:2], k)  # warm-up (thread pools, lazily built structures)
    single, after = [], []
    start = time.perf_counter()
    for i in range(len(queries)):
        single.append(search(queries[i : i + 1], k)[0])
        after.append(rerank())
    single_ms = (time.perf_counter() - start - sum(after) / 1000) * 1000 / len(queries)
    start = time.perf_counter()
    search(queries, k)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    recall = np.mean([len(set(single[i]) & set(truth[i])) / k for i in range(len(queries))])
    return {"ms_per_query_single": single_ms, "ms_per_query_batched": batch_ms, f"recall@{k}": float(recall),
            "rerank_ms_after": float(np.median(after))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256], help="64: the bench model's; 256: the card default")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.1, help="noise std per dimension around a centre")
    parser.add_argument("--k", type=int, default=10, help="rows per search (Serve asks for its `candidates`, "
                        "100-200); results go to bench_index_search_k<k>.json unless 10")
    args = parser.parse_args()
    commit = git_commit()
    results = {}
    for dim in args.dims:
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(args.clusters, dim)).astype(np.float32) / np.sqrt(dim)
        vectors = clustered_unit_vectors(rng, args.vectors, centres, args.spread)
        queries = clustered_unit_vectors(rng, args.queries, centres, args.spread)
        ours = exact(vectors)
        truth = ours(queries, args.k)
        rerank = rerank_stand_in()
        alone = float(np.median([rerank() for _ in range(len(queries) + 10)][10:]))  # the first 10 warm up
        rows = {EXACT: {"build_s": 0.0, **measure(ours, queries, truth, rerank)}}
        for name, (built, search) in faiss_methods(vectors).items():
            rows[name] = {"build_s": built, **measure(search, queries, truth, rerank)}
        base = rows[EXACT]["ms_per_query_single"]
        print(f"\n{args.vectors:,} vectors × {dim}, {args.queries} queries, top {args.k}; the torch workload alone: {alone:.2f} ms")
        print_table(["method", "build s", "ms/query (single)", "speed-up vs exact", "ms/query (batch)", f"recall@{args.k}",
                     "torch workload after it, ms"],
                    [[n, f"{r['build_s']:.1f}", f"{r['ms_per_query_single']:.3f}", f"{base / r['ms_per_query_single']:.1f}x",
                      f"{r['ms_per_query_batched']:.3f}", f"{r[f'recall@{args.k}']:.3f}", f"{r['rerank_ms_after']:.2f}"]
                     for n, r in rows.items()])
        results[f"dim_{dim}"] = {"torch_workload_alone_ms": alone, "methods": rows}
    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    settings = {**{k: getattr(args, k) for k in ("vectors", "dims", "queries", "clusters", "spread", "k")},
                "faiss": faiss_version}
    script = SCRIPT if args.k == 10 else f"{SCRIPT}_k{args.k}"
    print(f"\nwrote {write_results(script, torch.device('cpu'), commit, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
