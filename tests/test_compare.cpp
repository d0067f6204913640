// The comparison harness: the CPU passes the built-in suite, and a backend that is wrong
// in one element, or leaves NaN, is caught.
#include "op_check.h"
#include "test_device.h"

#include "compare.h"

#include <limits>

using namespace gfa;

TEST_CASE("normalized error: zero for equal, NaN and lost infinities fail", "[compare]") {
    const double inf = std::numeric_limits<double>::infinity();
    CHECK(compare::normalized_error({1.0f, -2.0f}, {1.0, -2.0}) == 0.0);
    CHECK(compare::normalized_error({1.0f, 0.0f}, {0.0, 1.0}) == Approx(std::sqrt(2.0)));
    CHECK(compare::normalized_error({NAN, 1.0f}, {1.0, 1.0}) == inf);
    CHECK(compare::normalized_error({NAN}, {std::nan("")}) == inf);
    CHECK(compare::normalized_error({-INFINITY, 1.0f}, {-inf, 1.0}) == 0.0);
    CHECK(compare::normalized_error({0.0f, 1.0f}, {-inf, 1.0}) == inf);
    CHECK(compare::normalized_error({1.0f}, {1.0, 2.0}) == inf);
}

TEST_CASE("the built-in suite passes on the CPU", "[compare]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    auto cpu = make_cpu_backend(2);
    REQUIRE(compare::builtin_suite().size() >= 20);
    for (const auto& c : compare::builtin_suite()) {
        const compare::CaseResult r = compare::run_case(c, *cpu, nullptr, seed);
        INFO("case " << c.name << ": " << r.error << " worst " << r.report.worst);
        CHECK(r.error.empty());
        CHECK(r.passed());
        CHECK(r.report.nodes.size() > 0);
        CHECK(r.report.n_splits >= 1);
    }
}

TEST_CASE("the comparison catches a backend that is wrong in one element", "[compare]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    auto cpu = make_cpu_backend(2);
    test::TestDevice good("TEST0", {Op::Add, Op::Mul, Op::Sub, Op::Neg});
    test::TestDevice bad("TEST1", {Op::Add, Op::Mul, Op::Sub, Op::Neg}, /*faulty=*/true);
    auto good_backend = good.create_backend(), bad_backend = bad.create_backend();
    for (const auto& c : compare::builtin_suite()) {
        const std::string name = c.name;
        if (name != "add" && name != "grad.elementwise") continue;
        INFO("case " << name);
        const compare::CaseResult ok = compare::run_case(c, *good_backend, cpu.get(), seed);
        CHECK(ok.passed());
        const compare::CaseResult wrong = compare::run_case(c, *bad_backend, cpu.get(), seed);
        CHECK_FALSE(wrong.passed());
        CHECK(wrong.report.worst > c.tol);
        // The first wrong node is one the faulty device computed.
        const compare::NodeResult* first_wrong = nullptr;
        for (const auto& n : wrong.report.nodes)
            if (!first_wrong && !(n.error <= c.tol)) first_wrong = &n;
        REQUIRE(first_wrong != nullptr);
        CHECK(first_wrong->backend == "TEST1");
        if (name == "grad.elementwise") CHECK(!ok.report.log.empty()); // exp, log... fell back to the CPU
    }
}

TEST_CASE("traced graphs compare node by node; different graphs are refused", "[compare]") {
    std::vector<TracedNode> want = {{"#0 mul_mat f32[3,1,1,1]", "CPU", {1.0f, 2.0f, -2.0f}},
                                    {"#1 add f32[2,1,1,1]", "CPU", {0.5f, -0.25f}}};
    std::vector<TracedNode> got = want;
    for (auto& n : got) n.backend = "DEV";
    got[1].values[1] = -0.25f + 0.5f * 0.25f; // off by half of that element
    const compare::Report r = compare::compare_traces(got, want);
    REQUIRE(r.nodes.size() == 2);
    CHECK(r.nodes[0].error == 0.0);
    CHECK(r.nodes[1].error == Approx(0.125 / std::sqrt(0.5 * 0.5 + 0.25 * 0.25)));
    CHECK(r.worst_index == 1);
    CHECK(r.nodes[1].backend == "DEV");
    got[0].values[2] = NAN;
    CHECK(compare::compare_traces(got, want).nodes[0].error == std::numeric_limits<double>::infinity());
    got[0].label = "#0 mul_mat f32[3,1,1,1] 'renamed'";
    CHECK_THROWS_WITH(compare::compare_traces(got, want), Catch::Contains("differ at node"));
    got.pop_back();
    CHECK_THROWS_WITH(compare::compare_traces(got, want), Catch::Contains("2 nodes"));
}
