/* mpi_hello: the MPI program of the batch tests (tests/test_batch*.py).
 *
 * Every rank prints one line
 *     mpi_hello rank R of S on HOST
 * then all ranks meet in a barrier, and each exits with the code given as
 * the first argument, else by $MPI_HELLO_EXIT, else 0 (so a test can check
 * that mpirun and Slurm report the container's exit code).
 *
 * Built inside the Open MPI image by tests/images/build_mpi_image.sh and on
 * the host with mpicc by tests/test_batch_infra.py.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    int rank = -1, size = -1, len = 0, code = 0;
    char host[MPI_MAX_PROCESSOR_NAME] = "";
    const char *env = getenv("MPI_HELLO_EXIT");

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    printf("mpi_hello rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    if (argc > 1)
        code = atoi(argv[1]);
    else if (env != NULL && *env != '\0')
        code = atoi(env);
    return code;
}
